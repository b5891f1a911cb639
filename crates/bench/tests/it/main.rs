//! Integration tests of the benchmark tools against real servers on
//! loopback (port 0). They check counts and accounting, never timings.

mod load;
mod startup;
