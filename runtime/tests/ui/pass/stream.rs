//! A streaming function: its stub opens the stream, `request` takes a
//! credit, `local` returns the stream itself. A function taking a stream:
//! its stub, `call` and `request` take one too.
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

#[wharf::microservice]
async fn total(scale: i64, items: Stream<i64>) -> Result<i64, String> {
    let mut items = items;
    let mut sum = 0;
    while let Some(item) = items.next().await {
        sum += item.map_err(|e| e.to_string())? * scale;
    }
    Ok(sum)
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
    let _: Result<i64, wharf::CallError<String>> = total(2, Stream::iter([1, 2])).await;
    let _ = total::call(client, 2, Stream::iter(0..3)).await;
    let _ = total::request(2, Stream::iter(0..3))
        .timeout(std::time::Duration::from_secs(1))
        .await;
    let _: Result<i64, String> = total::local(2, Stream::iter([1])).await;
    Ok(())
}

fn main() {}
