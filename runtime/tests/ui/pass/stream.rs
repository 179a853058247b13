//! A streaming function: its stub opens the stream, `request` takes a
//! credit, `local` returns the stream itself.
use wharf::Stream;

#[wharf::microservice]
async fn rows(n: u32) -> Stream<u32> {
    Stream::iter(0..n)
}

#[wharf::microservice]
fn words(text: String) -> wharf::Stream<String> {
    let words: Vec<String> = text.split(' ').map(str::to_owned).collect();
    wharf::Stream::iter(words)
}

#[allow(dead_code)]
async fn calls(client: &wharf::Client) -> Result<(), wharf::Error> {
    let mut items: Stream<u32> = rows(3).await?;
    while let Some(item) = items.next().await {
        let _: u32 = item?;
    }
    let _ = rows::request(3).credit(4).client(client).open().await?;
    let _ = words::call(client, "a b".to_owned()).await?;
    let _: Stream<u32> = rows::local(3).await;
    Ok(())
}

fn main() {}
