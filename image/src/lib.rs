//! Image references, registry client, content store and layer unpack
