# Shared by mgpu's jq programs (json::run reads files slurped, so the input is [document...]).

def fail($path; $msg): error("\($path): \($msg)");

# one_document — the file's one JSON document; an empty file or several documents are errors.
def one_document:
  if length == 0 then fail("."; "the file is empty: it must hold one JSON object")
  elif length > 1 then fail("."; "the file holds \(length) JSON documents one after another; it must hold one")
  else .[0] end;
