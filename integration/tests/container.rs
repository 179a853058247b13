//! wharf against nats-server in a container built locally `FROM scratch`:
//! a worker process on the host serves through the container's port.

use testcontainers::core::{IntoContainerPort, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::GenericImage;
use wharf::{Client, ErrorKind};
use wharf_integration::{add, nats_image, spawn_worker, take, wait_for_workers, InventoryError};

#[tokio::test]
async fn calls_through_nats_in_a_container() {
    let Some((name, tag)) = nats_image() else {
        return;
    };
    let container = GenericImage::new(name, tag)
        .with_exposed_port(4222.tcp())
        .with_wait_for(WaitFor::message_on_stderr("Server is ready"))
        .start()
        .await
        .expect("the local NATS image starts");
    let port = container.get_host_port_ipv4(4222).await.unwrap();
    let url = format!("nats://127.0.0.1:{port}");
    let client = Client::connect(&url).await.unwrap();

    let error = add::request(1, 2)
        .client(&client)
        .retry(wharf::RetryPolicy::NONE)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::NoResponders);

    let worker = spawn_worker(&url);
    wait_for_workers(&client, 1).await;
    assert_eq!(add::call(&client, 1, 2).await.unwrap(), 3);
    // JetStream in the container carries durable calls too.
    let durable = add::request(20, 22).client(&client).durable(true).await;
    assert_eq!(durable.unwrap(), 42);
    assert_eq!(
        take::call(&client, 50).await.unwrap_err(),
        wharf::CallError::Application(InventoryError::OutOfStock { left: 10 })
    );
    drop(worker);
}
