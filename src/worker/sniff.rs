//! The stored object's content type: the origin's, or, when it gives none or only a
//! generic one, what the first bytes show.

use bytes::Bytes;
use futures::StreamExt;

use crate::storage::ByteStream;

/// Bytes looked at to recognise a format.
const PEEK: usize = 512;
const GENERIC: &[&str] = &["application/octet-stream", "binary/octet-stream", "application/unknown"];
const FALLBACK: &str = "application/octet-stream";

fn is_generic(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    essence.is_empty() || GENERIC.contains(&essence.as_str())
}

/// Decide the content type, reading at most the first few chunks when the origin's is
/// missing or generic. The returned stream still yields every byte, from the first.
pub async fn content_type(declared: Option<String>, mut body: ByteStream) -> (String, ByteStream) {
    if let Some(declared) = declared.filter(|t| !is_generic(t)) {
        return (declared, body);
    }
    let mut peeked: Vec<Result<Bytes, _>> = Vec::new();
    let mut prefix = Vec::with_capacity(PEEK);
    while prefix.len() < PEEK {
        match body.next().await {
            Some(Ok(chunk)) => {
                prefix.extend_from_slice(&chunk[..chunk.len().min(PEEK - prefix.len())]);
                peeked.push(Ok(chunk));
            }
            Some(Err(e)) => {
                peeked.push(Err(e));
                break;
            }
            None => break,
        }
    }
    let sniffed = infer::get(&prefix).map_or(FALLBACK, |kind| kind.mime_type());
    (sniffed.to_owned(), futures::stream::iter(peeked).chain(body).boxed())
}

#[cfg(test)]
mod tests {
    use futures::TryStreamExt;

    use super::*;

    const PNG: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";

    fn body(parts: &[&'static [u8]]) -> ByteStream {
        let parts: Vec<_> = parts.iter().map(|p| Ok(Bytes::from_static(p))).collect();
        futures::stream::iter(parts).boxed()
    }

    #[tokio::test]
    async fn keeps_a_specific_declared_type_without_reading() {
        let (ct, rest) = content_type(Some("image/jpeg".into()), body(&[PNG])).await;
        assert_eq!(ct, "image/jpeg");
        assert_eq!(rest.try_collect::<Vec<_>>().await.unwrap().concat(), PNG);
    }

    #[tokio::test]
    async fn sniffs_missing_or_generic_types_and_keeps_every_byte() {
        for declared in [None, Some("application/octet-stream".to_owned()), Some("".to_owned())] {
            let (ct, rest) = content_type(declared, body(&[&PNG[..4], &PNG[4..], b"more"])).await;
            assert_eq!(ct, "image/png");
            let all = rest.try_collect::<Vec<_>>().await.unwrap().concat();
            assert_eq!(all, [PNG, b"more"].concat());
        }
        let (ct, _) = content_type(None, body(&[b"just some bytes"])).await;
        assert_eq!(ct, "application/octet-stream");
    }
}
