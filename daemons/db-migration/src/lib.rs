//! Baton's db-migration role.
