#[wharf::microservice]
struct NotAFunction;
fn main() {}
