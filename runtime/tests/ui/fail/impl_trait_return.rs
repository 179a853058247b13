#[wharf::microservice]
async fn numbers() -> impl Iterator<Item = u8> {
    0..3
}
fn main() {}
