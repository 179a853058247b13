//! The `#[microservice]` and `#[wharf::main]` compile-time contract: every
//! supported form compiles, every unsupported one is a spanned error.

#[test]
fn ui() {
    let cases = trybuild::TestCases::new();
    cases.pass("tests/ui/pass/*.rs");
    cases.compile_fail("tests/ui/fail/*.rs");
}
