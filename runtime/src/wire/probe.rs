//! Call-status probes (`<prefix>._status.<service>`): a caller whose call
//! is taking a while asks the service's workers which of its calls they
//! still hold. The request names call ids separated by spaces; each worker
//! that holds any answers with those ids, separated by spaces, and the
//! others stay silent.

/// The request for the calls `ids`.
pub fn request<'a>(ids: impl IntoIterator<Item = &'a str>) -> Vec<u8> {
    let mut payload = Vec::new();
    for id in ids {
        if !payload.is_empty() {
            payload.push(b' ');
        }
        payload.extend_from_slice(id.as_bytes());
    }
    payload
}

/// A worker's answer to probe `payload`: the ids `holds` says it holds,
/// separated by spaces (empty: it should stay silent).
pub fn answer(payload: &[u8], mut holds: impl FnMut(&[u8]) -> bool) -> Vec<u8> {
    let mut held = Vec::new();
    for id in ids(payload) {
        if holds(id) {
            if !held.is_empty() {
                held.push(b' ');
            }
            held.extend_from_slice(id);
        }
    }
    held
}

/// The call ids in a probe request or answer.
pub fn ids(payload: &[u8]) -> impl Iterator<Item = &[u8]> {
    payload.split(|b| *b == b' ').filter(|id| !id.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_names_the_calls_it_holds() {
        let request = request(["a1", "b2", "c3"]);
        assert_eq!(request, b"a1 b2 c3");
        assert_eq!(answer(&request, |id| id != b"b2"), b"a1 c3");
        assert!(answer(&request, |_| false).is_empty());
        // One id alone, as earlier callers sent it.
        assert_eq!(answer(b"a1", |_| true), b"a1");
        assert_eq!(ids(b"a1  b2").collect::<Vec<_>>(), [&b"a1"[..], b"b2"]);
    }
}
