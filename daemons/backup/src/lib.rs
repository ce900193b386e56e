//! Baton's backup role.
