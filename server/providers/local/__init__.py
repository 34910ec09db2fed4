"""Local LLM servers without native tool calling (Ollama, llama.cpp, vLLM, LM Studio, koboldcpp, web UI).

The pieces here are pure and synchronous; the provider layer does the HTTP. One call goes:

    deepseek.with_functions_in_system_prompt  (DeepSeek-R1 models only, on a copy)
    -> wrappers.render_prompt                  messages + functions -> one prompt text
    -> grammar.build_grammar                   (`-grammar` wrappers, llamacpp/koboldcpp/webui only)
    -> endpoints.build_local_request / auth_headers      the upstream call
    -> endpoints.extract_completion / parse_stream_event the text and usage that came back
    -> parsing.parse_function_call             text -> one function call (JSON repaired)
    -> completion.to_chat_completion           OpenAI ChatCompletion JSON
"""
