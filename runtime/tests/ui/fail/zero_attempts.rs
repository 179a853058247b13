// A retry policy needs at least one attempt.
#[wharf::microservice(attempts = 0)]
async fn add(a: i64, b: i64) -> i64 {
    a + b
}

fn main() {}
