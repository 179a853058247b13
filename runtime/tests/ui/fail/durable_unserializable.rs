// A durable call's result is stored and sent back, so the return type must
// be serializable; a type that is not is a compile error, not a run-time one.
pub struct Handle(std::fs::File);

#[wharf::microservice(durable)]
async fn open() -> Handle {
    Handle(std::fs::File::open("/dev/null").unwrap())
}

fn main() {}
