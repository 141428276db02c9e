# cmake -DNM=<nm> -DOBJECT=<object file> -P check_no_weak_symbols.cmake
#
# Fails if an instruction-set build of the kernel defines a weak symbol. The
# linker keeps one copy of each weak symbol for the whole module: an inline
# function instantiated in the AVX-512 object (a std:: template, say) could be
# the copy that the portable build calls too, and crash on a CPU without
# AVX-512. Everything in recurrence.cc has internal linkage to prevent that;
# this check keeps it so.
execute_process(
  COMMAND "${NM}" --defined-only "${OBJECT}"
  OUTPUT_VARIABLE symbols
  RESULT_VARIABLE status)
if(NOT status EQUAL 0)
  message(FATAL_ERROR "${NM} failed on ${OBJECT}")
endif()
string(REGEX MATCHALL "[^\n]* [VvWw] [^\n]*" weak "${symbols}")
if(weak)
  message(FATAL_ERROR "${OBJECT} defines weak symbols, which the instruction-set builds "
                      "could share: ${weak}")
endif()
