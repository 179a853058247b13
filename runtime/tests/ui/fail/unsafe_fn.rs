#[wharf::microservice]
unsafe fn risky(x: u8) -> u8 {
    x
}
fn main() {}
