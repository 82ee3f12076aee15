// measure_read_bandwidth is declared in matmul.cuh (the contract); this header only forwards to it.
#pragma once
#include "matmul.cuh"
