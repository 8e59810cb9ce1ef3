//! The stagedoor contracts, generated from `proto/` at build time.
//!
//! Each service's package is a module (`stagedoor_proto::queue::v1`, ...). [`FILE_DESCRIPTOR_SET`]
//! holds every contract, with its imports, for server reflection.

/// Encoded `google.protobuf.FileDescriptorSet` of every stagedoor proto and its imports.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/stagedoor_descriptor.bin"));

/// `stagedoor.queue.*`
pub mod queue {
    /// `stagedoor.queue.v1`: the waiting room.
    pub mod v1 {
        tonic::include_proto!("stagedoor.queue.v1");
    }
}

/// `stagedoor.concert.*`
pub mod concert {
    /// `stagedoor.concert.v1`: catalog, seats and holds.
    pub mod v1 {
        tonic::include_proto!("stagedoor.concert.v1");
    }
}

/// `stagedoor.point.*`
pub mod point {
    /// `stagedoor.point.v1`: the wallet.
    pub mod v1 {
        tonic::include_proto!("stagedoor.point.v1");
    }
}

/// `stagedoor.payment.*`
pub mod payment {
    /// `stagedoor.payment.v1`: the payment saga.
    pub mod v1 {
        tonic::include_proto!("stagedoor.payment.v1");
    }
}

/// The codec of every generated client and server: prost's, with smaller buffers.
///
/// tonic's default gives every call an 8 KiB buffer to encode into and another to decode
/// from, on each side, and keeps them for as long as the call lives. stagedoor's messages
/// are a few hundred bytes (a seat map of 1,000 seats is the largest, about 30 KiB), and a
/// rush holds thousands of calls and streams open at once: 10,000 fans waiting on
/// WatchQueueStatus kept 10,000 pairs of mostly empty buffers. A buffer that starts at
/// 1 KiB grows like any `BytesMut` when a bigger message comes along.
pub mod codec {
    use std::marker::PhantomData;

    use tonic::codec::{BufferSettings, Codec};
    use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

    /// Where an encode or decode buffer starts.
    const BUFFER_SIZE: usize = 1024;
    /// A server stream hands its buffer to the transport once it holds this much (tonic's
    /// default, kept).
    const YIELD_THRESHOLD: usize = 32 * 1024;

    fn buffer_settings() -> BufferSettings {
        BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD)
    }

    /// [`ProstCodec`] with [`BUFFER_SIZE`] buffers; named by `codec_path` in `build.rs`.
    #[derive(Debug, Clone, Copy)]
    pub struct SmallBufferCodec<T, U>(PhantomData<(T, U)>);

    impl<T, U> Default for SmallBufferCodec<T, U> {
        fn default() -> Self {
            Self(PhantomData)
        }
    }

    impl<T, U> Codec for SmallBufferCodec<T, U>
    where
        T: prost::Message + Send + 'static,
        U: prost::Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = ProstEncoder<T>;
        type Decoder = ProstDecoder<U>;

        fn encoder(&mut self) -> Self::Encoder {
            ProstCodec::<T, U>::raw_encoder(buffer_settings())
        }

        fn decoder(&mut self) -> Self::Decoder {
            ProstCodec::<T, U>::raw_decoder(buffer_settings())
        }
    }
}
