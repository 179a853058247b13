//! Procedural macros for wharf.
//!
//! Users depend on the `wharf` crate, which re-exports these as
//! `#[wharf::microservice]` and `#[wharf::main]`; the expansions name
//! `::wharf` paths only.

use proc_macro::TokenStream;

mod main_attr;
mod microservice;
mod options;

/// Turns a free function into a microservice: calling it performs a NATS
/// request served by a worker. See the `wharf` crate documentation.
#[proc_macro_attribute]
pub fn microservice(attr: TokenStream, item: TokenStream) -> TokenStream {
    microservice::expand(attr.into(), item.into())
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}

/// Marks the program's entry point: in the worker role the binary serves its
/// microservices; otherwise `main` runs on a multi-threaded tokio runtime.
#[proc_macro_attribute]
pub fn main(attr: TokenStream, item: TokenStream) -> TokenStream {
    main_attr::expand(attr.into(), item.into())
        .unwrap_or_else(|error| {
            // A stand-in `main`, so the attribute's error is the only one shown.
            let mut tokens = error.into_compile_error();
            tokens.extend(quote::quote!(
                fn main() {}
            ));
            tokens
        })
        .into()
}
