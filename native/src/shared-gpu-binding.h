// Registers SharedGpuGroup and cudaDeviceCount (shared-gpu-binding.cc) on the addon's exports.
#pragma once

#include <napi.h>

namespace weft::js {

void InitSharedGpu(Napi::Env env, Napi::Object exports);

}  // namespace weft::js
