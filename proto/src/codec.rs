//! The protobuf codec of every Steward service, with small starting buffers.
//!
//! tonic's default codec starts each stream with an 8 KiB encode and an
//! 8 KiB decode buffer. A replica holds one agent session stream open per
//! node, and almost every message on it (heartbeats, acks) is under 100
//! bytes: at 10,000 agents those buffers alone were 160 MB of a replica's
//! memory. These start at [`START_BYTES`] and grow as a larger message
//! (a desired state, a converge report) needs.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Each stream's encode and decode buffer starts this large.
pub const START_BYTES: usize = 1024;
/// An encoder yields to the transport once this much is buffered (tonic's
/// default).
const YIELD_BYTES: usize = 32 * 1024;

/// `tonic_prost::ProstCodec` with [`START_BYTES`] buffers (`proto/build.rs`
/// makes the generated services use it).
#[derive(Debug, Clone)]
pub struct LeanCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for LeanCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::new(START_BYTES, YIELD_BYTES))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::new(START_BYTES, YIELD_BYTES))
    }
}

#[cfg(test)]
mod tests {
    use tonic::codec::{Decoder, Encoder};

    use super::*;
    use crate::pb;

    #[test]
    fn streams_start_with_small_buffers() {
        let mut codec = LeanCodec::<pb::CoordinatorMessage, pb::AgentMessage>::default();
        // The fields are private: the sizes show in the Debug output.
        let encoder = format!("{:?}", codec.encoder().buffer_settings());
        let decoder = format!("{:?}", codec.decoder().buffer_settings());
        assert!(encoder.contains("buffer_size: 1024"), "{encoder}");
        assert!(decoder.contains("buffer_size: 1024"), "{decoder}");
    }
}
