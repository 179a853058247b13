#[wharf::microservice(stateful, durable)]
async fn count(by: u64, total: wharf::State<u64>) -> u64 {
    let mut total = total;
    *total += by;
    *total
}
fn main() {}
