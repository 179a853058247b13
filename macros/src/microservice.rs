//! `#[microservice]`: the remote stub, the argument struct, the handler and
//! the registration generated from one ordinary function.
//!
//! For `fn add(a: i64, b: i64) -> i64` in module `m`, the expansion puts in `m`:
//! - `add`: an `async fn` with the same arguments that calls the service and
//!   returns `Result<i64, wharf::Error>` (or `Result<T, wharf::CallError<E>>`
//!   for a function returning `Result<T, E>`);
//! - a module `add` (types and values live in separate namespaces, so a module
//!   and a function may share the name) with `local`, `call`, `request`,
//!   `Args` and `SPEC`;
//! - hidden items (`__wharf_add_*`) holding the original body, the handler and
//!   the spec, plus an `inventory` registration for workers.
//!
//! Everything that mentions the user's types is defined in `m` itself, so the
//! types resolve exactly as the user wrote them; the `add` module only
//! re-exports.

use crate::options::{self, Options};
use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned, ToTokens};
use syn::{
    ext::IdentExt, spanned::Spanned, Attribute, FnArg, GenericArgument, Ident, ItemFn, Pat,
    PathArguments, ReturnType, Type, Visibility,
};

/// Default call timeout when the attribute gives none.
const DEFAULT_TIMEOUT_MS: u64 = 30_000;

pub(crate) fn expand(attr: TokenStream, item: TokenStream) -> syn::Result<TokenStream> {
    let options = options::parse(attr)?;
    let func: ItemFn = match syn::parse2(item.clone()) {
        Ok(func) => func,
        Err(_) => {
            return Err(syn::Error::new_spanned(
                item,
                "#[microservice] goes on a free `fn` or `async fn` (not on a struct, impl block or trait)",
            ))
        }
    };
    let shape = Shape::read(&func, options.stateful)?;
    match shape.args.iter().filter(|arg| arg.state.is_some()).nth(usize::from(options.stateful)) {
        Some(arg) if options.stateful => {
            return Err(syn::Error::new_spanned(
                &arg.ty,
                "a stateful function takes at most one `State<S>` argument: gather the state in one type",
            ))
        }
        Some(arg) => {
            return Err(syn::Error::new_spanned(
                &arg.ty,
                "`State<S>` holds a transaction's state: mark the function #[microservice(stateful)]",
            ))
        }
        None => {}
    }
    if let Some(item) = &shape.stream {
        let why = if options.durable {
            Some("a durable call's result is stored whole, so it cannot be streamed")
        } else if options.stateful {
            Some("stateful functions cannot stream their result yet")
        } else {
            None
        };
        if let Some(why) = why {
            return Err(syn::Error::new_spanned(
                item,
                format!("{why}: return the items as one value (a `Vec`), or drop the option"),
            ));
        }
    }
    check_stream_arg(&func, &shape, &options)?;
    let ident = func.sig.ident.unraw().to_string();
    let token_safe = ident
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if options.name.is_none() && !token_safe {
        return Err(syn::Error::new(
            func.sig.ident.span(),
            "this function's name cannot be a NATS subject token (only A-Z, a-z, 0-9, '_', '-'); give it a wire name with #[microservice(name = \"...\")]",
        ));
    }
    Ok(generate(&func, &shape, &options))
}

/// A stream argument is read as the worker grants credit: one per
/// function, in an async function whose calls are plain.
fn check_stream_arg(func: &ItemFn, shape: &Shape, options: &Options) -> syn::Result<()> {
    let mut streams = shape.args.iter().filter(|arg| arg.stream.is_some());
    let Some(first) = streams.next() else {
        return Ok(());
    };
    let why = if let Some(second) = streams.next() {
        return Err(syn::Error::new_spanned(
            &second.ty,
            "a function takes at most one `Stream<T>` argument: send the items of both in one stream of a type that holds either",
        ));
    } else if func.sig.asyncness.is_none() {
        "a function that takes a stream reads it with `.await`: make it an `async fn`"
    } else if options.durable {
        "a durable call's arguments are stored whole, so one cannot be a stream: take the items as one value (a `Vec`), or drop `durable`"
    } else if options.stateful {
        "stateful functions cannot take a stream yet: take the items as one value (a `Vec`)"
    } else if shape.stream.is_some() {
        "a function cannot yet both take and return a stream: return the result as one value, or take the input as one value (a `Vec`)"
    } else {
        return Ok(());
    };
    Err(syn::Error::new_spanned(&first.ty, why))
}

/// One argument: its plain name (patterns are rejected) and type.
struct Arg {
    name: Ident,
    ty: Type,
    /// `S` of a `State<S>` argument, which the worker supplies from the
    /// transaction rather than the caller over the wire.
    state: Option<Type>,
    /// `T` of a `wharf::Stream<T>` argument, whose items follow the
    /// request rather than travel in it.
    stream: Option<Type>,
}

/// What the signature says, validated.
struct Shape {
    args: Vec<Arg>,
    /// The function's return type as written (`()` when omitted).
    ret: Type,
    /// `Some((T, E))` when the function returns `Result<T, E>`.
    fallible: Option<(Type, Type)>,
    /// `Some(T)` when the function returns `wharf::Stream<T>`.
    stream: Option<Type>,
}

impl Shape {
    /// `stateful`: any `State<S>` argument is the transaction's state; in
    /// other functions only `wharf::State<S>` is (and is then an error),
    /// so a type of the user's own named `State` still crosses the wire.
    fn read(func: &ItemFn, stateful: bool) -> syn::Result<Shape> {
        let sig = &func.sig;
        if let Some(token) = &sig.constness {
            return Err(unsupported(token.span(), "a `const fn`"));
        }
        if let Some(token) = &sig.unsafety {
            return Err(unsupported(token.span(), "an `unsafe fn`"));
        }
        if let Some(abi) = &sig.abi {
            return Err(unsupported(abi.span(), "an `extern` function"));
        }
        if let Some(variadic) = &sig.variadic {
            return Err(unsupported(variadic.span(), "a variadic function"));
        }
        if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
            return Err(syn::Error::new_spanned(
                &sig.generics,
                "generic functions cannot be microservices: a call on the wire has one concrete signature; \
                 write a non-generic function for each type you serve",
            ));
        }
        let mut args = Vec::new();
        for input in &sig.inputs {
            match input {
                FnArg::Receiver(receiver) => {
                    return Err(syn::Error::new_spanned(
                        receiver,
                        "`self` is not supported: a microservice is a free function; \
                         pass the state it needs as an argument",
                    ))
                }
                FnArg::Typed(typed) => {
                    let name = match &*typed.pat {
                        Pat::Ident(ident) if ident.by_ref.is_none() && ident.subpat.is_none() => {
                            ident.ident.clone()
                        }
                        other => {
                            return Err(syn::Error::new_spanned(
                                other,
                                "patterns are not supported in argument position: \
                                 bind a plain name (`point: Point`) and destructure it in the body",
                            ))
                        }
                    };
                    let state = state_type(&typed.ty, stateful);
                    if state.is_none() {
                        check_wire_type(&typed.ty, "argument")?;
                    }
                    let stream = match state {
                        None => stream_item(&typed.ty),
                        Some(_) => None,
                    };
                    args.push(Arg {
                        name,
                        ty: (*typed.ty).clone(),
                        state,
                        stream,
                    });
                }
            }
        }
        let ret: Type = match &sig.output {
            ReturnType::Default => syn::parse_quote!(()),
            ReturnType::Type(_, ty) => {
                check_wire_type(ty, "return")?;
                (**ty).clone()
            }
        };
        let fallible = result_parts(&ret);
        let stream = stream_item(&ret);
        Ok(Shape {
            args,
            ret,
            fallible,
            stream,
        })
    }
}

fn unsupported(span: Span, what: &str) -> syn::Error {
    syn::Error::new(
        span,
        format!("{what} cannot be a microservice: use a plain `fn` or `async fn`"),
    )
}

/// Rejects types that cannot cross the wire as owned, serializable values:
/// references, lifetimes, `impl Trait`, trait objects, pointers, fn pointers.
fn check_wire_type(ty: &Type, position: &str) -> syn::Result<()> {
    // `new_spanned` marks the whole offending type, not just its first token.
    let fail = |tokens: &dyn ToTokens, why: &str| {
        Err(syn::Error::new_spanned(
            tokens.to_token_stream(),
            format!("{position} type {why}"),
        ))
    };
    match ty {
        Type::Reference(reference) => fail(
            reference,
            "is a reference: values cross the wire owned; take `String` instead of `&str`, `Vec<T>` instead of `&[T]`, `T` instead of `&T`",
        ),
        Type::ImplTrait(imp) => fail(
            imp,
            "is `impl Trait`: the wire needs one concrete, serializable type",
        ),
        Type::TraitObject(obj) => fail(
            obj,
            "is a trait object: the wire needs a concrete, serializable type",
        ),
        Type::Ptr(ptr) => fail(ptr, "is a raw pointer, which cannot be serialized"),
        Type::BareFn(bare) => fail(
            bare,
            "is a function pointer, which cannot be serialized",
        ),
        Type::Infer(infer) => fail(infer, "must be written out, not inferred"),
        Type::Macro(mac) => fail(
            mac,
            "is a macro invocation; write the type out so its signature can be hashed",
        ),
        Type::Paren(inner) => check_wire_type(&inner.elem, position),
        Type::Group(inner) => check_wire_type(&inner.elem, position),
        Type::Array(array) => check_wire_type(&array.elem, position),
        Type::Slice(slice) => fail(
            slice,
            "is an unsized slice; use `Vec<T>`",
        ),
        Type::Tuple(tuple) => tuple
            .elems
            .iter()
            .try_for_each(|elem| check_wire_type(elem, position)),
        Type::Path(path) => {
            if let Some(qself) = &path.qself {
                check_wire_type(&qself.ty, position)?;
            }
            for segment in &path.path.segments {
                if let PathArguments::AngleBracketed(generic) = &segment.arguments {
                    for arg in &generic.args {
                        match arg {
                            GenericArgument::Type(inner) => check_wire_type(inner, position)?,
                            GenericArgument::Lifetime(lifetime) => {
                                return fail(
                                    lifetime,
                                    "borrows (it has a lifetime): values cross the wire owned",
                                )
                            }
                            _ => {}
                        }
                    }
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// `S` of an argument typed `State<S>`: written `wharf::State<S>`, or,
/// in a stateful function, also imported as `State<S>`.
fn state_type(ty: &Type, stateful: bool) -> Option<Type> {
    let Type::Path(path) = ty else { return None };
    if path.qself.is_some() {
        return None;
    }
    let qualified = path.path.segments.len() == 2 && path.path.segments[0].ident == "wharf";
    if !stateful && !qualified {
        return None;
    }
    let last = path.path.segments.last()?;
    single_type_argument(last, "State")
}

/// `T` of a return type written `wharf::Stream<T>` (or `Stream<T>`,
/// imported from wharf): a function whose result is streamed.
fn stream_item(ty: &Type) -> Option<Type> {
    let Type::Path(path) = ty else { return None };
    if path.qself.is_some() {
        return None;
    }
    let segments: Vec<_> = path.path.segments.iter().collect();
    let last = match segments.as_slice() {
        [last] if path.path.leading_colon.is_none() => last,
        [wharf, last] if wharf.ident == "wharf" => last,
        _ => return None,
    };
    single_type_argument(last, "Stream")
}

/// `T` of a path segment written `<name><T>`, with one type argument.
fn single_type_argument(segment: &syn::PathSegment, name: &str) -> Option<Type> {
    if segment.ident != name {
        return None;
    }
    let PathArguments::AngleBracketed(generic) = &segment.arguments else {
        return None;
    };
    match generic.args.iter().collect::<Vec<_>>().as_slice() {
        [GenericArgument::Type(inner)] => Some(inner.clone()),
        _ => None,
    }
}

/// `Result<T, E>` written with two type arguments marks a fallible function.
fn result_parts(ty: &Type) -> Option<(Type, Type)> {
    let Type::Path(path) = ty else { return None };
    let last = path.path.segments.last()?;
    if last.ident != "Result" {
        return None;
    }
    let PathArguments::AngleBracketed(generic) = &last.arguments else {
        return None;
    };
    let mut types = generic.args.iter().filter_map(|arg| match arg {
        GenericArgument::Type(ty) => Some(ty.clone()),
        _ => None,
    });
    let (ok, err) = (types.next()?, types.next()?);
    types.next().is_none().then_some((ok, err))
}

/// Where each of the user's own attributes goes.
#[derive(Default)]
struct SortedAttrs {
    /// `#[cfg]`: on every generated item.
    cfg: Vec<Attribute>,
    /// Docs and `#[deprecated]`: on the public stub.
    stub: Vec<Attribute>,
    /// `#[allow]`: on the stub and on the body.
    allow: Vec<Attribute>,
    /// Everything else (`#[tracing::instrument]`, `#[inline]`, other lints):
    /// on the function that runs the body.
    body: Vec<Attribute>,
}

fn sort_attrs(attrs: &[Attribute], fn_name: &str) -> SortedAttrs {
    let mut sorted = SortedAttrs::default();
    for attr in attrs {
        let path = attr.path();
        if path.is_ident("cfg") {
            sorted.cfg.push(attr.clone());
        } else if path.is_ident("doc") || path.is_ident("deprecated") {
            sorted.stub.push(attr.clone());
        } else if path.is_ident("allow") {
            sorted.allow.push(attr.clone());
        } else if path
            .segments
            .last()
            .is_some_and(|s| s.ident == "instrument")
        {
            sorted.body.push(name_instrument_span(attr, fn_name));
        } else {
            sorted.body.push(attr.clone());
        }
    }
    sorted
}

/// The body runs in a renamed function, so a `#[tracing::instrument]` placed
/// below `#[microservice]` is given the function's own name for its span.
fn name_instrument_span(attr: &Attribute, fn_name: &str) -> Attribute {
    let path = attr.path();
    let (args, named) = match &attr.meta {
        syn::Meta::Path(_) => (TokenStream::new(), false),
        syn::Meta::List(list) => {
            // `name = ".."` given (not `skip(name)` or a field called name).
            let tokens: Vec<proc_macro2::TokenTree> = list.tokens.clone().into_iter().collect();
            let named = tokens.windows(2).any(|pair| {
                matches!(&pair[0], proc_macro2::TokenTree::Ident(i) if i == "name")
                    && matches!(&pair[1], proc_macro2::TokenTree::Punct(p) if p.as_char() == '=')
            });
            (list.tokens.clone(), named)
        }
        syn::Meta::NameValue(_) => return attr.clone(),
    };
    if named {
        return attr.clone();
    }
    let sep = if args.is_empty() { quote!() } else { quote!(,) };
    syn::parse_quote!(#[#path(name = #fn_name #sep #args)])
}

/// Visibility for the re-exports inside the `add` module: the same reach the
/// original function had, expressed from one module deeper.
fn reexport_vis(vis: &Visibility) -> TokenStream {
    match vis {
        Visibility::Public(_) => quote!(pub),
        Visibility::Inherited => quote!(pub(super)),
        Visibility::Restricted(restricted) => {
            let path = &restricted.path;
            let first = path.segments.first().map(|s| s.ident.to_string());
            match first.as_deref() {
                Some("crate") => quote!(#vis),
                Some("self") if path.segments.len() == 1 => quote!(pub(super)),
                Some("self") => {
                    let rest = path.segments.iter().skip(1);
                    quote!(pub(in super #(:: #rest)*))
                }
                Some("super") => quote!(pub(in super :: #path)),
                _ => quote!(#vis),
            }
        }
    }
}

/// Signature text with whitespace removed, e.g. `add(a:i64,b:i64)->i64`.
fn signature_text(name: &str, shape: &Shape) -> String {
    let compact = |tokens: &dyn ToTokens| -> String {
        tokens
            .to_token_stream()
            .to_string()
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect()
    };
    let args: Vec<String> = shape
        .args
        .iter()
        .filter(|arg| arg.state.is_none())
        .map(|arg| format!("{}:{}", arg.name.unraw(), compact(&arg.ty)))
        .collect();
    format!("{name}({})->{}", args.join(","), compact(&shape.ret))
}

fn generate(func: &ItemFn, shape: &Shape, options: &Options) -> TokenStream {
    let vis = &func.vis;
    let ident = &func.sig.ident;
    // `r#type` is `type` on the wire and in serde's JSON keys.
    let ident_text = ident.unraw().to_string();
    let wire_name = options.name.clone().unwrap_or_else(|| ident_text.clone());
    let attrs = sort_attrs(&func.attrs, &ident_text);
    let SortedAttrs {
        cfg,
        stub: stub_attrs,
        allow,
        body: body_attrs,
    } = &attrs;

    let local = format_ident!("__wharf_{}_local", ident);
    let args_struct = format_ident!("__wharf_{}_Args", ident);
    let spec = format_ident!("__WHARF_{}_SPEC", ident);
    let handler = format_ident!("__wharf_{}_handler", ident);
    let call = format_ident!("__wharf_{}_call", ident);
    let request = format_ident!("__wharf_{}_request", ident);
    let collect = format_ident!("__wharf_{}_collect", ident);
    let client = Ident::new("__wharf_client", Span::call_site());
    let incoming = Ident::new("__wharf_incoming", Span::call_site());

    // What travels in the request; `State<S>` arguments come from the
    // worker, a `Stream<T>` argument's items follow the request.
    let wire: Vec<&Arg> = shape
        .args
        .iter()
        .filter(|arg| arg.state.is_none() && arg.stream.is_none())
        .collect();
    let names: Vec<&Ident> = wire.iter().map(|arg| &arg.name).collect();
    let types: Vec<&Type> = wire.iter().map(|arg| &arg.ty).collect();
    // What the caller passes: every argument but the state.
    let callers: Vec<&Arg> = shape
        .args
        .iter()
        .filter(|arg| arg.state.is_none())
        .collect();
    let caller_names: Vec<&Ident> = callers.iter().map(|arg| &arg.name).collect();
    let caller_types: Vec<&Type> = callers.iter().map(|arg| &arg.ty).collect();
    let stream_arg = shape
        .args
        .iter()
        .find_map(|arg| Some((&arg.name, arg.stream.as_ref()?)));
    let stream_let = stream_arg.map(|(name, item)| {
        let span = item.span();
        quote_spanned!(span=> let #name = #incoming.input::<#item>().await?;)
    });
    let all_names: Vec<&Ident> = shape.args.iter().map(|arg| &arg.name).collect();
    let state_lets: Vec<TokenStream> = shape
        .args
        .iter()
        .filter_map(|arg| {
            let name = &arg.name;
            let inner = arg.state.as_ref()?;
            let span = inner.span();
            Some(quote_spanned!(span=> let #name = #incoming.state::<#inner>().await?;))
        })
        .collect();
    let name_strings: Vec<String> = names.iter().map(|n| n.unraw().to_string()).collect();
    let type_strings: Vec<String> = types
        .iter()
        .map(|ty| ty.to_token_stream().to_string().replace(' ', ""))
        .collect();

    let ret = &shape.ret;
    let (returns, stub_output, error_text) = match (&shape.stream, &shape.fallible) {
        (Some(item), _) => (
            quote!(::wharf::Streamed<#item>),
            quote!(::core::result::Result<::wharf::Stream<#item>, ::wharf::Error>),
            quote!(::core::option::Option::None),
        ),
        (None, Some((ok, err))) => (
            quote!(::wharf::__private::Fallible<#ok, #err>),
            quote!(::core::result::Result<#ok, ::wharf::CallError<#err>>),
            {
                let text = err.to_token_stream().to_string().replace(' ', "");
                quote!(::core::option::Option::Some(#text))
            },
        ),
        (None, None) => (
            quote!(::wharf::__private::Plain<#ret>),
            quote!(::core::result::Result<#ret, ::wharf::Error>),
            quote!(::core::option::Option::None),
        ),
    };
    let returns_text = ret.to_token_stream().to_string().replace(' ', "");

    let signature = signature_text(&wire_name, shape);
    let sig_hash = options::fnv1a64(&signature);
    let service = match &options.service {
        Some(service) => quote!(#service),
        None => quote!(::core::env!("CARGO_CRATE_NAME")),
    };
    let timeout_ms = options.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
    let idempotent = options.idempotent;
    let durable = options.durable;
    let stateful = options.stateful;
    let attempts = match options.attempts {
        Some(n) => quote!(#n),
        None => quote!(::wharf::RetryPolicy::DEFAULT.attempts),
    };
    let backoff_ms = match options.backoff_ms {
        Some(ms) => quote!(#ms),
        None => quote!(::wharf::RetryPolicy::DEFAULT.backoff_ms),
    };
    let max_backoff_ms = match options.max_backoff_ms {
        Some(ms) => quote!(#ms),
        // A backoff above the default ceiling raises the ceiling with it.
        None => match options.backoff_ms {
            Some(ms) => {
                quote!(if #ms > ::wharf::RetryPolicy::DEFAULT.max_backoff_ms { #ms } else { ::wharf::RetryPolicy::DEFAULT.max_backoff_ms })
            }
            None => quote!(::wharf::RetryPolicy::DEFAULT.max_backoff_ms),
        },
    };
    let is_async = func.sig.asyncness.is_some();

    // The original function, renamed, with its own signature and body.
    let mut local_sig = func.sig.clone();
    local_sig.ident = local.clone();
    let block = &func.block;

    // Handler: decode, run (off the async threads when sync), encode.
    let run = if is_async {
        quote!(#local(#(#all_names),*).await)
    } else {
        quote!(#incoming.blocking(move || #local(#(#all_names),*)).await?)
    };
    let reply = if shape.stream.is_some() {
        quote!(#incoming.stream(__wharf_out).await)
    } else if shape.fallible.is_some() {
        quote! {
            match __wharf_out {
                ::core::result::Result::Ok(value) => #incoming.reply(&value),
                ::core::result::Result::Err(error) => {
                    #[allow(unused_imports)]
                    use ::wharf::__private::describe::{ViaDebug, ViaDisplay, ViaName};
                    let message = (&&&::wharf::__private::describe::Describe(&error)).describe();
                    #incoming.application_error(&error, message)
                }
            }
        }
    } else {
        quote!(#incoming.reply(&__wharf_out))
    };

    let reexport = reexport_vis(vis);
    let module_doc = format!(
        "Remote-call plumbing of [`{ident_text}`](fn@{ident_text}), served on `<prefix>.<service>.{wire_name}`: \
         `local(..)` runs the body in this process, `call(&client, ..)` calls through an explicit client, \
         `request(..)` sets per-call options{}; `Args` is the wire form of the arguments and `SPEC` the description.",
        if shape.stream.is_some() {
            " (`credit(n)` among them) and is awaited to open the stream"
        } else if stream_arg.is_some() {
            ""
        } else {
            ", `collect(call_id)` picks up a durable call's result"
        }
    );
    let hidden = quote!(#[doc(hidden)] #[allow(non_camel_case_types, non_snake_case, non_upper_case_globals, clippy::too_many_arguments)]);
    let new_args = quote!(#args_struct { #(#names),* });
    let with_stream = stream_arg.map(|(input, _)| quote!(.with_stream(#input)));
    let span = ident.span();
    let stub_sig = quote_spanned! {span=>
        #vis async fn #ident(#(#caller_names: #caller_types),*) -> #stub_output
    };
    // A stream is opened rather than sent, and has no stored result to collect.
    let (global_body, client_body, collect_fn, collect_use) = match (&shape.stream, stream_arg) {
        (_, Some((input, item))) => (
            quote!(::wharf::__private::call_with_stream_global::<#args_struct, #returns, #item>(&#spec, #new_args, #input).await),
            quote!(::wharf::__private::call_with_stream::<#args_struct, #returns, #item>(#client, &#spec, #new_args, #input).await),
            quote!(),
            quote!(),
        ),
        (Some(item), None) => (
            quote!(::wharf::__private::open_stream_global::<#args_struct, #item>(&#spec, #new_args).await),
            quote!(::wharf::__private::open_stream::<#args_struct, #item>(#client, &#spec, #new_args).await),
            quote!(),
            quote!(),
        ),
        (None, None) => (
            quote!(::wharf::__private::call_global::<#args_struct, #returns>(&#spec, #new_args).await),
            quote!(::wharf::__private::call::<#args_struct, #returns>(#client, &#spec, #new_args).await),
            quote! {
                #(#cfg)*
                #hidden
                #vis fn #collect(call_id: impl ::core::convert::Into<::std::string::String>) -> ::wharf::Pending<#returns> {
                    ::wharf::Pending::new(&#spec, call_id.into())
                }
            },
            quote! {
                #[doc(inline)]
                #reexport use super::#collect as collect;
            },
        ),
    };

    quote! {
        #(#cfg)*
        #(#stub_attrs)*
        #(#allow)*
        #[allow(clippy::too_many_arguments)]
        #stub_sig {
            #global_body
        }

        #(#cfg)*
        #(#allow)*
        #(#body_attrs)*
        #[doc(hidden)]
        #vis #local_sig #block

        #(#cfg)*
        #hidden
        #[derive(::wharf::__private::serde::Serialize, ::wharf::__private::serde::Deserialize)]
        #[serde(crate = "::wharf::__private::serde", deny_unknown_fields)]
        #vis struct #args_struct { #(pub #names: #types),* }

        #(#cfg)*
        #hidden
        #vis static #spec: ::wharf::FnSpec = ::wharf::FnSpec {
            service: #service,
            name: #wire_name,
            sig: #sig_hash,
            signature: #signature,
            args: &[#(::wharf::ArgSpec { name: #name_strings, ty: #type_strings }),*],
            returns: #returns_text,
            error: #error_text,
            timeout_ms: #timeout_ms,
            idempotent: #idempotent,
            durable: #durable,
            stateful: #stateful,
            retry: ::wharf::RetryPolicy {
                attempts: #attempts,
                backoff_ms: #backoff_ms,
                max_backoff_ms: #max_backoff_ms,
            },
            blocking: !#is_async,
            version: ::core::env!("CARGO_PKG_VERSION"),
            path: ::core::concat!(::core::module_path!(), "::", #ident_text),
            subject: ::wharf::__private::SubjectCache::new(),
        };

        #(#cfg)*
        #hidden
        fn #handler(#incoming: ::wharf::__private::Incoming) -> ::wharf::__private::HandlerFuture {
            ::std::boxed::Box::pin(async move {
                let #args_struct { #(#names),* } = #incoming.decode::<#args_struct>()?;
                #stream_let
                #(#state_lets)*
                let __wharf_out = #run;
                #reply
            })
        }

        #(#cfg)*
        const _: () = {
            ::wharf::__private::inventory::submit! {
                ::wharf::__private::Registration::new(&#spec, #handler)
            }
        };

        #(#cfg)*
        #hidden
        #vis async fn #call(#client: &::wharf::Client, #(#caller_names: #caller_types),*) -> #stub_output {
            #client_body
        }

        #(#cfg)*
        #hidden
        #vis fn #request(#(#caller_names: #caller_types),*) -> ::wharf::Request<#args_struct, #returns> {
            ::wharf::Request::new(&#spec, #new_args) #with_stream
        }

        #collect_fn

        #(#cfg)*
        #[doc = #module_doc]
        #vis mod #ident {
            #[doc(inline)]
            #reexport use super::#local as local;
            #[doc(inline)]
            #reexport use super::#call as call;
            #[doc(inline)]
            #reexport use super::#request as request;
            #collect_use
            #[doc(inline)]
            #reexport use super::#args_struct as Args;
            #[doc(inline)]
            #reexport use super::#spec as SPEC;
        }
    }
}
