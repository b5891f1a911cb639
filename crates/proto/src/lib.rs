//! Shoal's wire contracts: the generated messages, clients and servers for
//! every `.proto` under `proto/`, plus the file descriptor set that server
//! reflection serves.
//!
//! `tonic` and `prost` are re-exported so that services cannot drift to other
//! versions of them.

pub use prost;
pub use tonic;

/// `shoal.worker.v1`: task execution and jobs.
pub mod worker {
    pub mod v1 {
        tonic::include_proto!("shoal.worker.v1");
    }
}

/// `shoal.aggregator.v1`: the fleet metrics query API.
pub mod aggregator {
    pub mod v1 {
        tonic::include_proto!("shoal.aggregator.v1");
    }
}

/// The encoded `FileDescriptorSet` of every Shoal proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("shoal_descriptor");

/// Server reflection (v1 and v1alpha) over every Shoal service and
/// `grpc.health.v1`, so `grpcurl -plaintext HOST:PORT list` works with no
/// proto files.
pub mod reflection {
    /// The reflection services, v1 then v1alpha.
    ///
    /// # Panics
    ///
    /// Never at run time for Shoal's own descriptors: they are compiled in and
    /// checked by this crate's tests.
    pub fn services() -> (
        tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection>,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ) {
        let builder = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(super::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        #[allow(clippy::expect_used)]
        let v1 = builder().build_v1().expect("shoal descriptors are valid");
        #[allow(clippy::expect_used)]
        let v1alpha = builder().build_v1alpha().expect("shoal descriptors are valid");
        (v1, v1alpha)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn descriptors_build_reflection_services() {
        let _ = super::reflection::services();
        assert!(!super::FILE_DESCRIPTOR_SET.is_empty());
    }
}
