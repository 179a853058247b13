#[wharf::microservice(stateful)]
async fn count(by: u64, total: wharf::State<u64>, names: wharf::State<Vec<String>>) -> u64 {
    let _ = names;
    let mut total = total;
    *total += by;
    *total
}
fn main() {}
