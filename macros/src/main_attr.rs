//! `#[wharf::main]`: worker-role dispatch plus a tokio runtime for `main`.

use proc_macro2::TokenStream;
use quote::quote;
use syn::{spanned::Spanned, ItemFn};

pub(crate) fn expand(attr: TokenStream, item: TokenStream) -> syn::Result<TokenStream> {
    if !attr.is_empty() {
        return Err(syn::Error::new(
            attr.span(),
            "#[wharf::main] takes no options; configure wharf through wharf::Config or the environment",
        ));
    }
    let func: ItemFn = syn::parse2(item)?;
    let sig = &func.sig;
    if sig.ident != "main" {
        return Err(syn::Error::new(
            sig.ident.span(),
            "#[wharf::main] goes on the program's `fn main`",
        ));
    }
    if !sig.inputs.is_empty() || !sig.generics.params.is_empty() {
        return Err(syn::Error::new(
            sig.span(),
            "`main` takes no arguments and no generics",
        ));
    }
    let attrs = &func.attrs;
    let vis = &func.vis;
    let output = &sig.output;
    let body = &func.block;
    let run = if sig.asyncness.is_some() {
        quote! { ::wharf::__private::block_on(async move #body) }
    } else {
        quote! { #body }
    };
    Ok(quote! {
        #(#attrs)*
        #vis fn main() #output {
            // In the worker role this serves every registered microservice
            // and exits; the program's own `main` never runs there.
            ::wharf::__private::serve_if_worker();
            #run
        }
    })
}
