//! The migration engine: plan, disk pre-copy by temperature, memory, switchover (issue 9).
