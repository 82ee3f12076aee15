// Reading JS arguments, and the one place where native errors become JS errors.
//
// Every parse failure throws weft::Error naming the op and the parameter: Kind::Type (JS TypeError) for a
// value of the wrong JS type, Kind::Native for a value of the right type that is out of range.
#pragma once

#include <napi.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "error.h"
#include "tensor.h"

namespace weft::js {

class EngineHandle;

// Translate a weft::Error into a JS Error (TypeError for Kind::Type) with code 'WEFT_NATIVE' and `op`.
Napi::Error to_js_error(Napi::Env env, const weft::Error& e);

// Run f, translating anything native it throws; `op` names the failure when the exception carries none.
template <typename F>
Napi::Value guard(Napi::Env env, const char* op, F&& f) {
  try {
    return f();
  } catch (const Napi::Error&) {
    throw;
  } catch (const weft::Error& e) {
    throw to_js_error(env, e);
  } catch (const std::bad_alloc&) {
    throw to_js_error(env, weft::Error(op, "out of host memory"));
  } catch (const std::exception& e) {
    throw to_js_error(env, weft::Error(op, e.what()));
  }
}

template <typename T>
struct HostArray {
  T* data;
  size_t length;
};

class Args {
 public:
  // engine: the engine whose tensors are acceptable (nullptr: any).
  // Throws "engine is dead ..." when the engine's device had a sticky error.
  Args(const Napi::CallbackInfo& info, const char* op, const EngineHandle* engine);

  Napi::Value operator[](size_t i) const { return info_[i]; }
  Tensor tensor(size_t i, const char* name) const;
  std::vector<Tensor> tensors(size_t i, const char* name) const;  // a JS array of tensors
  int64_t integer(size_t i, const char* name) const;              // a safe integer
  double number(size_t i, const char* name) const;                // finite
  DType dtype(size_t i, const char* name) const;
  Shape shape(size_t i, const char* name) const;
  HostArray<const uint8_t> uint8_array(size_t i, const char* name) const;
  HostArray<const int32_t> int32_array(size_t i, const char* name) const;
  HostArray<const float> float32_array(size_t i, const char* name) const;

 private:
  Tensor tensor_value(Napi::Value value, const std::string& name) const;

  const Napi::CallbackInfo& info_;
  const char* op_;
  const EngineHandle* engine_;
};

// "undefined", "null", "number 3", "string", "Array", "Float64Array", "object", ...
std::string describe(Napi::Value value);

}  // namespace weft::js
