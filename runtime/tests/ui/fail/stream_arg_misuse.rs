// A stream argument is read with `.await`, once, in a plain call.
#[wharf::microservice]
fn sync_sum(items: wharf::Stream<i64>) -> i64 {
    let _ = items;
    0
}

#[wharf::microservice]
async fn two(a: wharf::Stream<i64>, b: wharf::Stream<i64>) -> i64 {
    let _ = (a, b);
    0
}

#[wharf::microservice(durable)]
async fn stored(items: wharf::Stream<i64>) -> i64 {
    let _ = items;
    0
}

#[wharf::microservice]
async fn both(items: wharf::Stream<i64>) -> wharf::Stream<i64> {
    items
}

fn main() {}
