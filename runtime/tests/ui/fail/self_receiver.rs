struct Counter;
impl Counter {
    #[wharf::microservice]
    async fn get(&self) -> u64 {
        0
    }
}
fn main() {}
