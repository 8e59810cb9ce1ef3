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
