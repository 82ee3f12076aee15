// Module entry: the addon's only NODE_API_MODULE. Everything it exports is declared in worker/native.ts.
#include <napi.h>

#include "binding.h"

namespace {
Napi::Object InitWeft(Napi::Env env, Napi::Object exports) { return weft::js::Init(env, exports); }
}  // namespace

NODE_API_MODULE(weft, InitWeft)
