//! The codec targets: bytes in, decode; if that succeeds, encoding the result must give back
//! exactly the same bytes (one encoding per message: the decoder rejects trailing bytes and
//! must reject every other non-canonical form too). Never panics otherwise.
//!
//! With `UDPMSG_FUZZ_ALLOW=noncanonical` (see [`crate::allowed`]) only the weaker property is
//! checked, while the known gap is open (postcard accepts over-long varints): the re-encoding
//! decodes to the same message and is never longer.

use udpmsg::proto;

pub fn decode_client(data: &[u8]) {
    if let Ok(msg) = proto::decode_client(data) {
        let again = proto::encode_client(&msg);
        if crate::allowed("noncanonical") {
            assert!(
                again.len() <= data.len() && proto::decode_client(&again).as_ref() == Ok(&msg),
                "{data:02x?}"
            );
            return;
        }
        assert!(
            again == data,
            "decode_client accepted a non-canonical datagram\n  in:  {data:02x?}\n  msg: {msg:?}\n  out: {again:02x?}"
        );
    }
}

pub fn decode_server(data: &[u8]) {
    if let Ok(msg) = proto::decode_server(data) {
        let again = proto::encode_server(&msg);
        if crate::allowed("noncanonical") {
            assert!(
                again.len() <= data.len() && proto::decode_server(&again).as_ref() == Ok(&msg),
                "{data:02x?}"
            );
            return;
        }
        assert!(
            again == data,
            "decode_server accepted a non-canonical datagram\n  in:  {data:02x?}\n  msg: {msg:?}\n  out: {again:02x?}"
        );
    }
}
