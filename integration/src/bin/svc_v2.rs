//! The second build of `itest.versioned`, whose signature changed from
//! `versioned(x: i64)` to `versioned(x: i64, y: i64)`: `svc_v2 worker`
//! serves it, and nothing else (it does not link the library's functions).

/// The new build of `wharf_integration::versioned`.
#[wharf::microservice(service = "itest")]
async fn versioned(x: i64, y: i64) -> String {
    format!("v2 {}", x + y)
}

#[wharf::main]
async fn main() -> Result<(), wharf::Error> {
    Err(wharf::Error::new(
        wharf::ErrorKind::Config,
        "svc_v2 only serves: run `svc_v2 worker` with NATS_URL set",
    ))
}
