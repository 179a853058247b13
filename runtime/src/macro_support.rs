//! Support for the code `#[microservice]` and `#[wharf::main]` generate.
//! Not a public API: reached as `wharf::__private`.

pub use crate::client::returns::{Fallible, Plain};
pub use crate::handler::{HandlerFuture, Incoming, Registration};
pub use crate::metrics::set_counting as set_metrics_counting;
#[cfg(feature = "otel")]
pub use crate::otel::set_exporting as set_span_export;
pub use crate::request::{
    call, call_global, call_with_stream, call_with_stream_global, open_stream, open_stream_global,
};
pub use crate::spec::SubjectCache;
pub use inventory;
pub use serde;

/// In the worker role, serves every microservice and exits the process; in
/// the describe role, prints them and exits.
pub fn serve_if_worker() {
    crate::init::describe_if_asked();
    if crate::init::is_drain_role() {
        std::process::exit(block_on(crate::init::drain_process()));
    }
    if crate::init::is_worker_role() {
        let code = block_on(crate::init::worker_process(std::time::Duration::from_secs(
            10,
        )));
        std::process::exit(code);
    }
}

/// Runs `future` on a new multi-threaded tokio runtime (`#[wharf::main]`),
/// then (with the `otel` feature) exports the spans still buffered.
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    let output = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("cannot start the tokio runtime")
        .block_on(future);
    #[cfg(feature = "otel")]
    crate::otel::flush();
    output
}

/// Text for an application error: its `Display` if it has one, else its
/// `Debug`, else its type name. Chosen at compile time by autoref.
pub mod describe {
    use std::fmt::{Debug, Display};

    /// Wraps the error being described.
    pub struct Describe<'a, T>(pub &'a T);

    /// Preferred: `Display`.
    pub trait ViaDisplay {
        /// The text.
        fn describe(&self) -> String;
    }
    impl<T: Display> ViaDisplay for &&Describe<'_, T> {
        fn describe(&self) -> String {
            self.0.to_string()
        }
    }

    /// Then `Debug`.
    pub trait ViaDebug {
        /// The text.
        fn describe(&self) -> String;
    }
    impl<T: Debug> ViaDebug for &Describe<'_, T> {
        fn describe(&self) -> String {
            format!("{:?}", self.0)
        }
    }

    /// Last resort: the type's name.
    pub trait ViaName {
        /// The text.
        fn describe(&self) -> String;
    }
    impl<T> ViaName for Describe<'_, T> {
        fn describe(&self) -> String {
            format!("an error of type {}", std::any::type_name::<T>())
        }
    }
}
