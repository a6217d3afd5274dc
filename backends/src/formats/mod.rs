//! The model file formats the engines read beside their own loaders: GGUF's header and
//! metadata, and the ONNX protobuf (its wire format and the parts of a `ModelProto` we read).

pub mod gguf;
pub mod onnx_model;
pub mod protobuf;
