//! The codec of every generated service: prost's, except that a message that does not
//! decode (invalid UTF-8 in a string field, a truncated or mistyped field) is
//! `InvalidArgument`, not prost's `Internal`. The sender's bytes are wrong, not the
//! receiver: a client must not retry them as it would a server fault. prost's message
//! names the field (`CreateRequest.name: invalid string value: ...`).
//!
//! Both sides use it (tonic generates one codec per service), so a client that
//! receives a malformed response sees `InvalidArgument` too, with the same message.

use std::marker::PhantomData;

use prost::Message;
use tonic::{
    Code, Status,
    codec::{BufferSettings, DecodeBuf, Decoder},
};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// `tonic_prost::ProstCodec` with decode failures reported as `InvalidArgument`.
#[derive(Debug, Clone)]
pub struct Codec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = StrictDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        StrictDecoder(ProstDecoder::default())
    }
}

/// [`ProstDecoder`] whose decode errors are `InvalidArgument`.
#[derive(Debug, Clone)]
pub struct StrictDecoder<U>(ProstDecoder<U>);

impl<U: Message + Default> Decoder for StrictDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(src).map_err(invalid)
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// prost's `Internal` decode status as `InvalidArgument`, message kept.
fn invalid(s: Status) -> Status {
    if s.code() == Code::Internal {
        Status::invalid_argument(s.message().to_owned())
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_internal_becomes_invalid_argument() {
        let s = invalid(Status::internal(
            "failed to decode Protobuf message: X.name",
        ));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "failed to decode Protobuf message: X.name");
        assert_eq!(
            invalid(Status::out_of_range("big")).code(),
            Code::OutOfRange
        );
    }
}
