//! Slicing images into chunks with io_uring, and rebuilding them (issue 2).
