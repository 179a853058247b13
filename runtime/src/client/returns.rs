//! How a reply becomes a Rust result: [`Plain`] for functions returning
//! `T`, [`Fallible`] for `Result<T, E>`, and the worker's identity
//! ([`Reply`]) for callers that ask.

use crate::error::{CallError, Error, ErrorKind};
use crate::spec::FnSpec;
use crate::wire::codec::Codec;
use crate::wire::reply::{remote_failure, ApplicationErrorBody};
use async_nats::Message;
use serde::de::DeserializeOwned;
use std::marker::PhantomData;

/// A decoded reply together with what the worker reported about itself.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply<T> {
    /// The function's return value.
    pub value: T,
    /// `Wharf-Instance` of the worker that served the call:
    /// `<instance id> <pid> <host>`.
    pub instance: Option<String>,
    /// Tries the call took, 1 when nothing was retried.
    pub attempts: u32,
}

impl<T> Reply<T> {
    /// The pid of the worker that served the call, when it reported one.
    pub fn pid(&self) -> Option<u32> {
        self.instance.as_deref()?.split(' ').nth(1)?.parse().ok()
    }
}

/// How a function's reply is turned into a Rust result: [`Plain`] for
/// functions returning `T`, [`Fallible`] for `Result<T, E>`.
pub trait Returns {
    /// The successful value.
    type Value;
    /// The error: [`Error`] or [`CallError<E>`].
    type Err: From<Error>;
    /// Interprets a reply message encoded with `codec`.
    fn decode(spec: &FnSpec, codec: Codec, message: &Message) -> Result<Self::Value, Self::Err>;
}

/// [`Returns`] for a function returning `T`.
pub struct Plain<T>(PhantomData<fn() -> T>);

/// [`Returns`] for a function returning `Result<T, E>`.
pub struct Fallible<T, E>(PhantomData<fn() -> (T, E)>);

impl<T: DeserializeOwned> Returns for Plain<T> {
    type Value = T;
    type Err = Error;
    fn decode(spec: &FnSpec, codec: Codec, message: &Message) -> Result<T, Error> {
        if let Some((_, error)) = remote_failure(codec, message) {
            return Err(error);
        }
        decode_value(spec, codec, message)
    }
}

impl<T: DeserializeOwned, E: DeserializeOwned> Returns for Fallible<T, E> {
    type Value = T;
    type Err = CallError<E>;
    fn decode(spec: &FnSpec, codec: Codec, message: &Message) -> Result<T, Self::Err> {
        match remote_failure(codec, message) {
            Some((422, _)) => {
                let body: ApplicationErrorBody<E> =
                    codec.decode(&message.payload).map_err(|e| {
                        Error::new(
                            ErrorKind::Codec,
                            format!("cannot decode the error value of `{}`: {e}", spec.path),
                        )
                        .with_source(e)
                    })?;
                Err(CallError::Application(body.error))
            }
            Some((_, error)) => Err(error.into()),
            None => Ok(decode_value(spec, codec, message)?),
        }
    }
}

fn decode_value<T: DeserializeOwned>(
    spec: &FnSpec,
    codec: Codec,
    message: &Message,
) -> Result<T, Error> {
    codec.decode(&message.payload).map_err(|e| {
        Error::new(
            ErrorKind::Codec,
            format!(
                "cannot decode the reply of `{}` as `{}`: {e}",
                spec.path, spec.returns
            ),
        )
        .with_source(e)
    })
}
