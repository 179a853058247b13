//! Functions the call tests and the span tests both serve.

use serde::{Deserialize, Serialize};

/// `divide`'s own error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum MathError {
    /// The divisor was zero.
    DivisionByZero,
}

impl std::fmt::Display for MathError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("division by zero")
    }
}

/// Adds.
#[wharf::microservice(service = "calls")]
pub async fn add(a: i64, b: i64) -> i64 {
    a + b
}

/// Divides; a sync function with its own error.
#[wharf::microservice(service = "calls")]
pub fn divide(a: f64, b: f64) -> Result<f64, MathError> {
    if b == 0.0 {
        Err(MathError::DivisionByZero)
    } else {
        Ok(a / b)
    }
}
