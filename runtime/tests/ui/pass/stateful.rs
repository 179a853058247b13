//! Stateful functions: a `State<S>` argument anywhere in the list (or
//! none), sync or async, imported or by path; the stub takes only what
//! travels on the wire.
use wharf::State;

#[derive(Default)]
struct Tally {
    seen: Vec<String>,
}

#[wharf::microservice(stateful)]
async fn note(tally: State<Tally>, name: String) -> usize {
    let mut tally = tally;
    tally.seen.push(name);
    tally.seen.len()
}

#[wharf::microservice(stateful, timeout = "2s")]
fn count(by: u64, total: wharf::State<u64>) -> u64 {
    let mut total = total;
    *total += by;
    *total
}

#[wharf::microservice(stateful)]
async fn pinned_only() -> u32 {
    7
}

async fn calls(tx: &wharf::Transaction) -> Result<(), wharf::Error> {
    let _: usize = note("a".into()).await?;
    let _: u64 = count::request(2).transaction(tx).await?;
    let _: u32 = tx.run(pinned_only()).await?;
    let _ = note::local(State::new(Tally::default()), "b".into()).await;
    assert!(note::SPEC.stateful);
    assert_eq!(count::SPEC.signature, "count(by:u64)->u64");
    Ok(())
}

fn main() {
    let _ = calls;
}
