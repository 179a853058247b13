// The README's example, kept compiling.
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
pub enum MathError { DivisionByZero }

#[wharf::microservice]
pub async fn add(a: i64, b: i64) -> i64 {
    a + b
}

#[wharf::microservice(timeout = "2s")]
pub fn divide(a: f64, b: f64) -> Result<f64, MathError> {
    if b == 0.0 { Err(MathError::DivisionByZero) } else { Ok(a / b) }
}

#[wharf::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    wharf::init().await?;                     // local mode: starts nats-server and 2 workers
    let sum = add(2, 3).await?;               // a NATS request on wharf.<crate>.add
    match divide(1.0, 0.0).await {
        Err(wharf::CallError::Application(e)) => println!("the function said {e:?}"),
        other => println!("{other:?}"),
    }
    assert_eq!(add::local(2, 3).await, sum);  // the body itself, no NATS
    Ok(())
}
