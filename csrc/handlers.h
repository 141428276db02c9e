// XLA FFI handlers for the LSTM recurrence, which the Python module hands to
// `jax.ffi.register_ffi_target`.
//
// Three targets, all float32 on the host:
//   banded_rnn_lstm_forward        (x, kernel, recurrent, bias, h0, c0, valid, dropmask,
//                                   packed; batch_major) -> (hs, c_final)
//   banded_rnn_lstm_forward_train  (x, kernel, recurrent, bias, h0, c0, valid, dropmask)
//                                   -> (hs, cs, acts)
//   banded_rnn_lstm_backward       (recurrent, kernel, x, h0, hs, c0, valid, dropmask, cs,
//                                   acts, dhs, dc_last)
//                                   -> (dx, dkernel, drecurrent, dbias, dh0, dc0)
// with the layouts of recurrence.h. Every array may carry the same leading
// "group" axes as `recurrent` (what vmap adds with vmap_method="broadcast_all"):
// each group runs with its own weights. The row axes between time and the
// last axis are flattened. `valid` and `dropmask` may be empty, meaning every
// step is valid and no dropout; an empty `dx`, or empty weight gradients
// (all three), are not computed. With `batch_major`, the inference forward
// writes hs as [..., rows..., time, units], the layout a model returns, so
// that no transpose of its largest output follows (NOTES entry 18).

#ifndef BANDED_RNN_HANDLERS_H_
#define BANDED_RNN_HANDLERS_H_

#include "xla/ffi/api/api.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(BandedRnnLstmForward);       // banded_rnn_lstm_forward
XLA_FFI_DECLARE_HANDLER_SYMBOL(BandedRnnLstmForwardTrain);  // banded_rnn_lstm_forward_train
XLA_FFI_DECLARE_HANDLER_SYMBOL(BandedRnnLstmBackward);      // banded_rnn_lstm_backward

#endif  // BANDED_RNN_HANDLERS_H_
