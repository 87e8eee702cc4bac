"""ChuanhuStyleChat: a streaming chat app on Gradio."""
