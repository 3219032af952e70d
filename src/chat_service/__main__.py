from chat_service.cli import main

main()
