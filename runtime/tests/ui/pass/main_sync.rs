#[wharf::main]
fn main() {
    assert!(!wharf::is_worker_role());
}
