//! Mesh on Kubernetes: the CRDs and the manifests `mesh install` prints.

pub mod crds;
pub mod install;
pub mod manifest;
