//! The codec of the generated service and client: prost's, except that a message that does not
//! decode is INVALID_ARGUMENT (the caller sent it) rather than prost's INTERNAL, which the API
//! reserves for engine failures.

use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Prefix of the message of a request that could not be decoded.
pub const UNDECODABLE: &str = "the request message could not be decoded";

/// [`ProstCodec`] with decode errors as INVALID_ARGUMENT.
#[derive(Debug, Clone, Default)]
pub struct ArbiterCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Codec for ArbiterCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ArbiterDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        ArbiterDecoder(self.0.decoder())
    }
}

/// [`ProstDecoder`] with decode errors as INVALID_ARGUMENT.
#[derive(Debug, Clone, Default)]
pub struct ArbiterDecoder<U>(ProstDecoder<U>);

impl<U: Message + Default> Decoder for ArbiterDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|s| Status::invalid_argument(format!("{UNDECODABLE}: {}", s.message())))
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
