#[wharf::microservice(durable)]
async fn rows(n: u32) -> wharf::Stream<u32> {
    wharf::Stream::iter(0..n)
}
fn main() {}
