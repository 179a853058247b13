use std::borrow::Cow;
#[wharf::microservice]
async fn keep(text: Cow<'static, str>) -> String {
    text.into_owned()
}
fn main() {}
