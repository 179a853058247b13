#[wharf::microservice]
async fn echo(text: String) -> String {
    text
}

#[wharf::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    assert_eq!(echo::local("hi".into()).await, "hi");
    tokio::task::yield_now().await;
    Ok(())
}
