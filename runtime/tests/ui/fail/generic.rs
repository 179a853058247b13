#[wharf::microservice]
async fn first<T: serde::Serialize>(items: Vec<T>) -> usize {
    items.len()
}
fn main() {}
