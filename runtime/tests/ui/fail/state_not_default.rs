struct NoDefault(u64);
#[wharf::microservice(stateful)]
async fn count(by: u64, total: wharf::State<NoDefault>) -> u64 {
    let mut total = total;
    total.0 += by;
    total.0
}
fn main() {}
