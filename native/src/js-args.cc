#include "js-args.h"

#include <cmath>
#include <new>

#include "binding.h"

namespace weft::js {
namespace {

constexpr double kMaxSafeInteger = 9007199254740991.0;  // Number.MAX_SAFE_INTEGER

const char* typed_array_name(napi_typedarray_type t) {
  switch (t) {
    case napi_int8_array: return "Int8Array";
    case napi_uint8_array: return "Uint8Array";
    case napi_uint8_clamped_array: return "Uint8ClampedArray";
    case napi_int16_array: return "Int16Array";
    case napi_uint16_array: return "Uint16Array";
    case napi_int32_array: return "Int32Array";
    case napi_uint32_array: return "Uint32Array";
    case napi_float32_array: return "Float32Array";
    case napi_float64_array: return "Float64Array";
    case napi_bigint64_array: return "BigInt64Array";
    case napi_biguint64_array: return "BigUint64Array";
    default: return "TypedArray";
  }
}

template <typename T>
HostArray<const T> typed_array(Napi::Value v, napi_typedarray_type type, const char* op, const char* name) {
  WEFT_TYPE_CHECK(v.IsTypedArray() && v.As<Napi::TypedArray>().TypedArrayType() == type, op, name, " must be a ",
                  typed_array_name(type), " (got ", describe(v), ")");
  auto array = v.As<Napi::TypedArrayOf<T>>();
  return {array.Data(), array.ElementLength()};
}

}  // namespace

Napi::Error to_js_error(Napi::Env env, const weft::Error& e) {
  Napi::Error error = e.kind() == weft::Error::Kind::Type ? Napi::TypeError::New(env, e.what())
                                                          : Napi::Error::New(env, e.what());
  error.Set("code", Napi::String::New(env, "WEFT_NATIVE"));
  error.Set("op", Napi::String::New(env, e.op()));
  return error;
}

std::string describe(Napi::Value v) {
  if (v.IsUndefined()) return "undefined";
  if (v.IsNull()) return "null";
  if (v.IsNumber()) return "number " + Napi::String(v.Env(), v.ToString()).Utf8Value();
  if (v.IsString()) return "string";
  if (v.IsBoolean()) return "boolean";
  if (v.IsArray()) return "Array";
  if (v.IsTypedArray()) return typed_array_name(v.As<Napi::TypedArray>().TypedArrayType());
  if (v.IsFunction()) return "function";
  if (v.IsObject()) return "object";
  return "a value of another type";
}

Args::Args(const Napi::CallbackInfo& info, const char* op, const EngineHandle* engine)
    : info_(info), op_(op), engine_(engine) {
  if (engine_ != nullptr) engine_->backend()->check_alive(op_);
}

Tensor Args::tensor_value(Napi::Value value, const std::string& name) const {
  TensorHandle* handle = TensorHandle::FromValue(value);
  WEFT_TYPE_CHECK(handle != nullptr, op_, name, " must be a weft Tensor (got ", describe(value), ")");
  WEFT_CHECK(!handle->disposed(), op_, name, " ", handle->tensor(), " was disposed");
  WEFT_CHECK(engine_ == nullptr || handle->owner() == engine_->backend().get(), op_, name, " ", handle->tensor(),
             " belongs to a different engine (download and upload it to move it)");
  if (engine_ != nullptr) {
    engine_->backend()->check_usable(op_, name.c_str(), handle->tensor());
    engine_->backend()->before_use(op_, name.c_str(), handle->tensor());
  }
  return handle->tensor();
}

Tensor Args::tensor(size_t i, const char* name) const { return tensor_value(info_[i], name); }

std::vector<Tensor> Args::tensors(size_t i, const char* name) const {
  Napi::Value v = info_[i];
  WEFT_TYPE_CHECK(v.IsArray(), op_, name, " must be an Array of weft Tensors (got ", describe(v), ")");
  Napi::Array array = v.As<Napi::Array>();
  std::vector<Tensor> out;
  out.reserve(array.Length());
  for (uint32_t j = 0; j < array.Length(); ++j)
    out.push_back(tensor_value(array.Get(j), std::string(name) + "[" + std::to_string(j) + "]"));
  return out;
}

double Args::number(size_t i, const char* name) const {
  Napi::Value v = info_[i];
  WEFT_TYPE_CHECK(v.IsNumber(), op_, name, " must be a number (got ", describe(v), ")");
  double d = v.As<Napi::Number>().DoubleValue();
  WEFT_CHECK(std::isfinite(d), op_, name, " must be finite (got ", d, ")");
  return d;
}

int64_t Args::integer(size_t i, const char* name) const {
  Napi::Value v = info_[i];
  WEFT_TYPE_CHECK(v.IsNumber(), op_, name, " must be an integer (got ", describe(v), ")");
  double d = v.As<Napi::Number>().DoubleValue();
  WEFT_CHECK(std::isfinite(d) && std::trunc(d) == d && std::fabs(d) <= kMaxSafeInteger, op_, name,
             " must be an integer (got ", d, ")");
  return static_cast<int64_t>(d);
}

DType Args::dtype(size_t i, const char* name) const {
  Napi::Value v = info_[i];
  WEFT_TYPE_CHECK(v.IsString(), op_, name, " must be 'f32', 'f16', 'bf16' or 'i32' (got ", describe(v), ")");
  std::string s = v.As<Napi::String>().Utf8Value();
  DType d;
  WEFT_CHECK(parse_dtype(s, &d), op_, name, " must be 'f32', 'f16', 'bf16' or 'i32' (got '", s, "')");
  return d;
}

Shape Args::shape(size_t i, const char* name) const {
  Napi::Value v = info_[i];
  WEFT_TYPE_CHECK(v.IsArray(), op_, name, " must be an Array of integers (got ", describe(v), ")");
  Napi::Array array = v.As<Napi::Array>();
  WEFT_CHECK(array.Length() <= 8, op_, name, " has ", array.Length(), " dimensions (at most 8)");
  Shape shape;
  for (uint32_t j = 0; j < array.Length(); ++j) {
    Napi::Value d = array.Get(j);
    double x = d.IsNumber() ? d.As<Napi::Number>().DoubleValue() : -1;
    WEFT_CHECK(d.IsNumber() && std::trunc(x) == x && x >= 0 && x <= kMaxSafeInteger, op_, name, "[", j, "] must be ",
               "an integer >= 0 (got ", describe(d), ")");
    shape.push_back(static_cast<int64_t>(x));
  }
  return shape;
}

HostArray<const uint8_t> Args::uint8_array(size_t i, const char* name) const {
  return typed_array<uint8_t>(info_[i], napi_uint8_array, op_, name);
}
HostArray<const int32_t> Args::int32_array(size_t i, const char* name) const {
  return typed_array<int32_t>(info_[i], napi_int32_array, op_, name);
}
HostArray<const float> Args::float32_array(size_t i, const char* name) const {
  return typed_array<float>(info_[i], napi_float32_array, op_, name);
}

}  // namespace weft::js
